"""Errors of the FHIR engine; each becomes an OperationOutcome with its HTTP status."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class OutcomeIssue:
    severity: str  # fatal | error | warning | information
    code: str  # OperationOutcome issue type (invalid, not-found, processing, ...)
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


def operation_outcome(issues: list[OutcomeIssue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


@dataclass
class FhirError(Exception):
    status: int
    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    issues: list[OutcomeIssue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    #: For a batch of items (e.g. bundle entries written together): which one failed.
    index: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.diagnostics)
        if not self.issues:
            self.issues = [OutcomeIssue("error", self.code, self.diagnostics, self.expression)]

    def within(self, where: str) -> FhirError:
        """The same error, said to have happened in `where` (e.g. a Bundle entry)."""
        self.diagnostics = f"{where}: {self.diagnostics}"
        self.issues = [replace(i, diagnostics=f"{where}: {i.diagnostics}") for i in self.issues]
        return self

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def bad_request(diagnostics: str, *expression: str, code: str = "invalid") -> FhirError:
    return FhirError(400, code, diagnostics, tuple(expression))


def not_found(diagnostics: str) -> FhirError:
    return FhirError(404, "not-found", diagnostics)


def gone(diagnostics: str) -> FhirError:
    return FhirError(410, "deleted", diagnostics)


def conflict(diagnostics: str) -> FhirError:
    return FhirError(409, "conflict", diagnostics)


def precondition_failed(diagnostics: str) -> FhirError:
    return FhirError(412, "conflict", diagnostics)


def unprocessable(diagnostics: str, *expression: str, code: str = "processing") -> FhirError:
    return FhirError(422, code, diagnostics, tuple(expression))


def not_supported(diagnostics: str, status: int = 400) -> FhirError:
    return FhirError(status, "not-supported", diagnostics)
