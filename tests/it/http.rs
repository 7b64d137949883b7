//! HTTP API tests: the real router on a loopback port, the real engine, fake cloud providers.
