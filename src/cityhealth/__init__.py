"""CityHealth: the Internet + healthcare platform of a city, built on one FHIR R4 engine."""

__version__ = "0.1.0"
