//! Pooled-IP allocation (pure, no I/O).
