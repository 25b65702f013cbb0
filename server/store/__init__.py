"""Concord's gallery store: the interface every backend implements and the embedded default (SQLite + FAISS).

    records     what is stored and answered (NewPhoto, PhotoRecord, AddResult, Hit, Recovery) and the input checks
    interface   the `Gallery` Protocol the service uses
    gallery     `GalleryStore`, the embedded backend: the facade and its search
    catalogue   its SQLite catalogue: schema, rows, metadata filters
    blobs       content-addressed photo bytes in a folder (every backend keeps bytes there)
    recovery    bringing the FAISS cache level with the catalogue at open
"""

from server.store.catalogue import recorded_dim, store_held
from server.store.gallery import GalleryStore
from server.store.interface import Gallery
from server.store.records import NORM_TOLERANCE, AddResult, Hit, NewPhoto, PhotoRecord, Recovery, check_vector
from server.vector_index import IndexSpec

__all__ = ["NORM_TOLERANCE", "AddResult", "Gallery", "GalleryStore", "Hit", "IndexSpec", "NewPhoto", "PhotoRecord",
           "Recovery", "check_vector", "recorded_dim", "store_held"]
