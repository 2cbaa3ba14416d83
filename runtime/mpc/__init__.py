"""Three-party replicated secret sharing: the secure engine, its randomness and the transports."""
