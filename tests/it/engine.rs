//! Engine tests against the real llama.cpp and the test model.
