"""Client updates by name. Runtimes look an algorithm up here and never branch on its name."""

from spearfl.algorithms import spear

ALGORITHMS = {
    "spear": spear.client_update,
}
