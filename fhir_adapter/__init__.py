"""FHIR I/O and the patient timeline.

Reads a patient's record from a FHIR R4 server (REST search, Bulk Data ``$export``) or from
export files, and normalises it into a :class:`~fhir_adapter.timeline.Timeline`. Nothing
here imports torch: the adapter runs where the model does not.
"""
