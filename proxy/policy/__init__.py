"""Policy: who is calling (identity), what it may do (registry), what a body may hold (validation,
bodies), the upstream's credentials, and provenance stamped into written records. Pure decisions; no
state of their own beyond caches."""
