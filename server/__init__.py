"""The photo-search server (torch-free): FastAPI app, gallery store, models in service."""
