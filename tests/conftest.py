"""Suite-wide fixtures. Broker and database fixtures live in their own plugin modules."""

pytest_plugins = ["broker_fixtures", "db_fixtures", "fleet_fixtures"]
