"""Parse a FHIR search query (search.html) into criteria and result parameters.

Names are checked against the official search parameters of the type; anything unknown or
unsupported is an error (400) unless the client asked for lenient handling, in which case it is
ignored and reported back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cityhealth.fhir.composites import composite_for
from cityhealth.fhir.definitions import Definitions, SearchParam
from cityhealth.fhir.errors import bad_request, not_supported

#: Parameters that shape the result rather than select resources.
RESULT_PARAMS = frozenset(
    {
        "_count",
        "_sort",
        "_total",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_format",
        "_pretty",
        "_cursor",
    }
)
#: Search-wide parameters the engine deliberately refuses (search.html lists them as optional).
REFUSED = {
    "_text": "full-text search on the narrative is not supported",
    "_content": "full-text search on the content is not supported",
    "_query": "named queries are not supported",
    "_filter": "the _filter parameter is not supported",
    "_list": "the _list parameter is not supported",
    "_contained": "searching contained resources is not supported",
    "_containedType": "searching contained resources is not supported",
    "_score": "relevance scores are not supported",
}
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"text", "not", "missing", "above", "below", "in", "not-in", "of-type"},
    "reference": {"missing", "identifier", "above", "below"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"missing", "above", "below", "contains"},
}
SUPPORTED_TYPES = frozenset(MODIFIERS)
SUMMARY_VALUES = frozenset({"true", "false", "text", "data", "count"})
TOTAL_VALUES = frozenset({"none", "estimate", "accurate"})


@dataclass(frozen=True)
class Criterion:
    """One query parameter: its values are OR-ed; criteria are AND-ed."""

    name: str  # as written, e.g. "subject:Patient.name" or "_has:Observation:patient:code"
    values: tuple[str, ...]


@dataclass(frozen=True)
class Include:
    source_type: str
    param: SearchParam | None  # None for the wildcard '*'
    target_type: str | None
    iterate: bool
    reverse: bool

    def render(self) -> str:
        name = "_revinclude" if self.reverse else "_include"
        if self.iterate:
            name += ":iterate"
        value = f"{self.source_type}:{self.param.code if self.param else '*'}"
        if self.target_type:
            value += f":{self.target_type}"
        return f"{name}={value}"


@dataclass
class SearchRequest:
    resource_type: str  # empty for a search across types
    #: The types a search across types covers (`_type`; all when not given).
    types: tuple[str, ...] = ()
    criteria: list[Criterion] = field(default_factory=list)
    count: int = 20
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    total: str = "none"
    summary: str | None = None
    elements: list[str] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    cursor: str | None = None
    ignored: list[str] = field(default_factory=list)  # lenient handling: what was skipped

    def canonical(self) -> list[tuple[str, str]]:
        """The parameters as understood, for self and paging links."""
        out = [(c.name, ",".join(v.replace(",", "\\,") for v in c.values)) for c in self.criteria]
        if self.types and not self.resource_type:
            out.insert(0, ("_type", ",".join(self.types)))
        if self.sort:
            out.append(("_sort", ",".join(("-" if d else "") + p for p, d in self.sort)))
        out.append(("_count", str(self.count)))
        if self.total != "none":
            out.append(("_total", self.total))
        if self.summary:
            out.append(("_summary", self.summary))
        if self.elements:
            out.append(("_elements", ",".join(self.elements)))
        for inc in self.includes:
            name, _, value = inc.render().partition("=")
            out.append((name, value))
        return out


def split_values(raw: str) -> tuple[str, ...]:
    """Split on commas not escaped with a backslash (search.html 'Escaping Search Parameters')."""
    values, current, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ",$|\\":
            current.append("\\" + raw[i + 1] if raw[i + 1] in "$|" else raw[i + 1])
            i += 2
            continue
        if ch == ",":
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    values.append("".join(current))
    return tuple(values)


class QueryParser:
    def __init__(self, definitions: Definitions, default_count: int, max_count: int) -> None:
        self.definitions = definitions
        self.default_count = default_count
        self.max_count = max_count

    def param(self, rtype: str, code: str) -> SearchParam | None:
        return self.definitions.params_for(rtype).get(code)

    def parse(
        self,
        rtype: str,
        query: list[tuple[str, str]],
        lenient: bool = False,
        types: tuple[str, ...] = (),
    ) -> SearchRequest:
        request = SearchRequest(resource_type=rtype, types=types, count=self.default_count)
        for name, raw in query:
            try:
                self._parse_one(request, name, raw)
            except Exception as error:
                if lenient and getattr(error, "status", 400) == 400:
                    request.ignored.append(name)
                    continue
                raise
        return request

    def parse_system(self, query: list[tuple[str, str]], lenient: bool = False) -> SearchRequest:
        """A search across resource types (`GET [base]?…`): `_type` picks the types, and every
        criterion must be a parameter of each of them."""
        types: list[str] = []
        for name, raw in query:
            if name == "_type":
                for rtype in raw.split(","):
                    if not self.definitions.is_resource_type(rtype):
                        raise bad_request(f"_type: unknown resource type '{rtype}'")
                    types.append(rtype)
        rest = [(n, v) for n, v in query if n != "_type"]
        request = self.parse("", rest, lenient, types=tuple(dict.fromkeys(types)))
        return request

    def _parse_one(self, request: SearchRequest, name: str, raw: str) -> None:
        base = name.split(":", 1)[0]
        if base in ("_format", "_pretty"):
            return
        if base in REFUSED:
            raise not_supported(f"Parameter {name}: {REFUSED[base]}")
        if base == "_count":
            if not raw.isdigit():
                raise bad_request(f"_count must be a non-negative integer, not '{raw}'")
            request.count = min(int(raw), self.max_count)
        elif base == "_sort":
            request.sort = [self._sort_key(request.resource_type, v) for v in raw.split(",")]
        elif base == "_total":
            if raw not in TOTAL_VALUES:
                raise bad_request(f"_total must be one of {sorted(TOTAL_VALUES)}")
            request.total = raw
        elif base == "_summary":
            if raw not in SUMMARY_VALUES:
                raise bad_request(f"_summary must be one of {sorted(SUMMARY_VALUES)}")
            request.summary = raw
        elif base == "_elements":
            request.elements = [e.strip() for e in raw.split(",") if e.strip()]
        elif base in ("_include", "_revinclude"):
            request.includes.append(self._include(name, raw))
        elif base == "_cursor":
            request.cursor = raw
        else:
            for rtype in self.searched_types(request):
                self.check_criterion(rtype, name)
            request.criteria.append(Criterion(name, split_values(raw)))

    def searched_types(self, request: SearchRequest) -> tuple[str, ...]:
        if request.resource_type:
            return (request.resource_type,)
        return request.types or tuple(sorted(self.definitions.resource_types))

    def _sort_key(self, rtype: str, value: str) -> tuple[str, bool]:
        descending = value.startswith("-")
        code = value.lstrip("-")
        if code not in ("_id", "_lastUpdated"):
            param = self.param(rtype, code)
            if param is None or param.type not in SUPPORTED_TYPES:
                raise bad_request(f"Cannot sort {rtype} by '{code}': unknown search parameter")
        return code, descending

    def _include(self, name: str, raw: str) -> Include:
        modifier = name.partition(":")[2]
        if modifier not in ("", "iterate", "recurse"):
            raise bad_request(f"Unknown modifier on {name}")
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not self.definitions.is_resource_type(parts[0]):
            raise bad_request(f"{name}={raw}: expected SourceType:param[:TargetType]")
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if target is not None and not self.definitions.is_resource_type(target):
            raise bad_request(f"{name}={raw}: unknown target type '{target}'")
        param = None
        if code != "*":
            param = self.param(source, code)
            if param is None or param.type != "reference":
                raise bad_request(
                    f"{name}={raw}: '{code}' is not a reference parameter of {source}"
                )
        return Include(source, param, target, modifier != "", name.startswith("_revinclude"))

    def check_criterion(self, rtype: str, name: str) -> None:
        """Raise 400 for a criterion name the engine cannot evaluate on `rtype`."""
        if name.startswith("_has:"):
            parts = name.split(":", 3)
            if len(parts) != 4 or not self.definitions.is_resource_type(parts[1]):
                raise bad_request(f"'{name}': expected _has:Type:reference-param:search-param")
            ref = self.param(parts[1], parts[2])
            if ref is None or ref.type != "reference":
                raise bad_request(
                    f"'{name}': '{parts[2]}' is not a reference parameter of {parts[1]}"
                )
            self.check_criterion(parts[1], parts[3])
            return
        head, dot, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        if code in ("_id", "_lastUpdated"):
            if modifier and modifier not in ("missing", "not", "exact"):
                raise bad_request(f"Modifier ':{modifier}' is not supported on {code}")
            return
        param = self.param(rtype, code)
        if param is None:
            raise bad_request(f"Unknown search parameter '{code}' for {rtype}")
        if param.type == "composite":
            if composite_for(self.definitions, param) is None or dot:
                raise not_supported(f"Composite parameter '{code}' is not supported")
            if modifier and modifier != "missing":
                raise bad_request(f"Modifier ':{modifier}' is not valid on '{code}' (composite)")
            return
        if param.type not in SUPPORTED_TYPES:
            raise not_supported(f"Search parameter '{code}' ({param.type}) is not supported")
        if param.expression is None:
            raise not_supported(f"Search parameter '{code}' has no expression for {rtype}")
        if dot:
            if param.type != "reference":
                raise bad_request(f"'{name}': only reference parameters can be chained")
            targets = self.chain_targets(param, modifier)
            if not any(self.param(t, rest.partition(".")[0].partition(":")[0]) for t in targets):
                raise bad_request(f"'{name}': no target of '{code}' has a parameter '{rest}'")
            for target in targets:
                if self.param(target, rest.partition(".")[0].partition(":")[0]):
                    self.check_criterion(target, rest)
            return
        type_modifier = param.type == "reference" and self.definitions.is_resource_type(modifier)
        if modifier and modifier not in MODIFIERS[param.type] and not type_modifier:
            raise bad_request(f"Modifier ':{modifier}' is not valid on '{code}' ({param.type})")
        if modifier in ("in", "not-in", "of-type", "above", "below") and param.type == "token":
            raise not_supported(f"Modifier ':{modifier}' on token parameters is not supported")
        if modifier in ("above", "below") and param.type == "reference":
            raise not_supported(f"Modifier ':{modifier}' on reference parameters is not supported")

    def chain_targets(self, param: SearchParam, modifier: str) -> list[str]:
        if modifier:
            if modifier not in param.targets and param.targets:
                raise bad_request(f"'{modifier}' is not a target type of '{param.code}'")
            return [modifier]
        return [t for t in param.targets if self.definitions.is_resource_type(t)]
