"""Fleet jobs (``scope = "fleet"``): one run per tick across every taskd host that shares a
PostgreSQL database. Nothing here is imported unless a fleet job exists: asyncpg is imported
only inside this package, so host jobs never pay for it."""
