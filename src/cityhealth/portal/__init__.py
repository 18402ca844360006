"""The server-rendered portal of residents and staff: Jinja2 pages in Simplified Chinese and
English, enhanced by htmx when it is installed, on the FHIR engine and the OAuth server."""

from cityhealth.portal.pages import register_portal

__all__ = ["register_portal"]
