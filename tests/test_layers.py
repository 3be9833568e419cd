"""Imports inside sem_cls point one way: no module reaches itself, and data imports nothing above
it. grimp reads every import, including those inside functions; imports for type annotations only
(under TYPE_CHECKING) do not run, so they are left out."""

import grimp
import pytest


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("sem_cls", cache_dir=None, exclude_type_checking_imports=True)


def test_no_import_cycles(graph):
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_data_imports_nothing_above_it(graph):
    allowed = ("sem_cls.data", "sem_cls.errors")
    upward = [
        f"{importer} -> {imported}"
        for importer in sorted(graph.find_descendants("sem_cls.data"))
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if imported.startswith("sem_cls") and not imported.startswith(allowed)
    ]
    assert not upward, "sem_cls.data imports upward:\n" + "\n".join(upward)
