"""Cloud operations: what a person runs against Google Cloud (infrastructure, deployment)."""
