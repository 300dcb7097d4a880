"""The event-loop side of serving: live state, the micro-batcher, the handle on the model, artifact watch."""
