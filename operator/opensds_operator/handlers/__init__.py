"""kopf handlers: thin adapters from API events to the reconcile functions."""
