"""An import-linter contract type: the given packages import nothing outside the standard library
(and themselves). The client must run where only Python is installed; import-linter's own
``forbidden`` contract names what is forbidden, and here everything but the standard library is.

Used by ``.importlinter`` (``[importlinter:contract:client-stdlib]``); it needs
``include_external_packages = True`` so that the graph holds third-party imports at all.
"""

from __future__ import annotations

import sys
from typing import Any

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class StdlibOnlyContract(Contract):
    """Configuration: ``modules``: the packages that may import only the standard library and
    their own modules."""

    type_name = "stdlib_only"

    modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        roots = [str(module) for module in self.modules]  # type: ignore[attr-defined]
        offences: list[tuple[str, str, int | None]] = []
        for root in roots:
            for importer in sorted({root, *graph.find_descendants(root)}):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    top = imported.split(".")[0]
                    if top in sys.stdlib_module_names or any(
                        imported == own or imported.startswith(own + ".") for own in roots
                    ):
                        continue
                    details = graph.get_import_details(importer=importer, imported=imported)
                    for detail in details or [{"line_number": None}]:
                        offences.append((importer, imported, detail["line_number"]))
        return ContractCheck(kept=not offences, metadata={"offences": offences})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, imported, line in check.metadata["offences"]:
            output.print_error(f"{importer} imports {imported} (l.{line}): not in the standard library")
            output.new_line()
