"""EHRMamba network, tasks, inference engine and artifact (built in the model issue)."""
