"""The model lifecycle (issue 20): operators' labels, the model registry's aliases, the promotion
gate, shadow runs. Between `service | reprocess` (which use it) and `report`."""
