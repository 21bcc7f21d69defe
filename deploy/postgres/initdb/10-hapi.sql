-- HAPI FHIR keeps its data in its own database on the stack's PostgreSQL server, owned by
-- the same user as the service's store. The image runs this on an empty volume only.
CREATE DATABASE hapi;
