"""The patient view page (``GET /patients/{id}/view``): layout and HTML."""
