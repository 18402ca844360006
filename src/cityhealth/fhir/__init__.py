"""The FHIR R4 engine: definitions, validation, indexing, search, repository, REST."""
