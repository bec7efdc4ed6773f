"""Code shared by every caduceus service: the event contract, the bus, the runtime, the blob store, config."""
