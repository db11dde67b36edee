"""rvm: recurrent visual models in JAX."""
