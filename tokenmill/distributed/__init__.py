"""Scale-out: what moves between engine processes (the KV connectors of prefill/decode disaggregation)."""
