"""The diagnosis: the RTF checklist as rules over plain windows, and its adapters (live history, Prometheus)."""
