"""The tiered tensor store. Knows nothing of models or vLLM. Its public names (``open_store``,
``StorageEngine``) are ``strata``'s; importing a module of this package imports no other."""
