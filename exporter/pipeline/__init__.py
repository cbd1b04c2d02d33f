"""The sampling pipeline: the sampler owns timing, builds one immutable snapshot per tick; the collector renders it."""
