"""dasklab: an event-driven controller for Dask labs (GKE in the cloud, real local processes on a laptop)."""

__version__ = "0.1.0"
