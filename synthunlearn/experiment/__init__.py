"""The paper's miniature experiment: a fictional world and its data sets (see :mod:`.world`)."""
