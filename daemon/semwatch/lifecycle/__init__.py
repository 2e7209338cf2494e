"""The model's life in the lab (issue 20): operators' labels, training from them, the model
registry's aliases, the promotion gate. Between `service | reprocess` (which use it) and `report`."""
