"""CDS Hooks 2.0: the client JWTs that EHRs send with each hook and feedback call."""
