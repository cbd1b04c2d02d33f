"""Sources read hardware into plain dataclasses; they know nothing of Prometheus."""
