"""The core model every stage and service shares: the per-request exchange (the transport-neutral
operation), the compiled rules state, the runtime interface services see, the journal records."""
