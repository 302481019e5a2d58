"""The query half: nearest codes, similar items and near-duplicate groups over what the
encoder wrote, and the web service ``imgenc serve`` runs.  It depends on ``encoder`` only.

    from search import Index, duplicates

    index = Index.open("out/catalogue")             # builds or updates DEST/index/
    index.similar("shoes/123.jpg", k=10)             # Neighbours(ids, distances)
    index.query([("q.jpg", open("q.jpg", "rb").read())], k=10)
    duplicates("out/catalogue").removable            # files that could go
"""

from search.duplicates import DuplicateGroups, duplicates, find_duplicates
from search.index import Index, Neighbours

__all__ = ["DuplicateGroups", "Index", "Neighbours", "duplicates", "find_duplicates"]
