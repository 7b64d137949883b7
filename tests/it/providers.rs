//! Fallback chain tests: fake cloud providers on loopback ports speaking the real APIs.
