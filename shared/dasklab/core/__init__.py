"""The controller's core: messages, pure policy, reconcile and the ports it drives (no cloud SDK)."""
