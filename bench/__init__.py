"""`invoke bench`: the API measured against the database's own ceiling, in one run."""
