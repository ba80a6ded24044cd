"""Chain cost: hoardrun_transfer via pgbench on three scratch databases in one run (issue 14).

before_010: migrated to 007 (no rules, no chain); chain: everything; chain_hash_constant: the
same, with hoardrun_entry_hash returning a constant (what sha256 and the canonical text cost).
Run from the repository root: python bench/chain_cost.py (uses 127.0.0.1:5432 as postgres).
"""
import subprocess
import sys
import tempfile
sys.path.insert(0, '.')
import psycopg2
from hoardrun.config import load_settings
from hoardrun import db as dbm, schema
from tests.conftest import base_environ
BASE = "postgresql://postgres@127.0.0.1:5432/"
def admin(sql):
    c = psycopg2.connect(BASE + "postgres"); c.autocommit = True; c.cursor().execute(sql); c.close()
def make(name, target):
    admin(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'); admin(f'CREATE DATABASE {name}')
    d = dbm.init_db(load_settings(base_environ(BASE + name)))
    schema.migrate(d, target=target) if target else schema.migrate(d)
    d.execute_sql("INSERT INTO users (id, email, first_name, last_name, password_hash) SELECT gen_random_uuid(), 'b'||i||'@x.io', 'B', 'U', 'x' FROM generate_series(1,500) i")
    d.execute_sql("INSERT INTO accounts (id, user_id, account_number, name, type, currency) SELECT gen_random_uuid(), u.id, (100000000000 + row_number() over () * 2 + k)::text, 'A', CASE k WHEN 0 THEN 'checking' ELSE 'savings' END, 'USD' FROM users u, generate_series(0,1) k")
    d.execute_sql("SELECT hoardrun_cash(gen_random_uuid(), NULL, id, 100000000, 'USD', true, 'f') FROM accounts WHERE type <> 'settlement'")
    d.execute_sql("CREATE TABLE bench_pairs AS SELECT row_number() OVER (ORDER BY u.id) AS n, u.id AS user_id, a1.id AS a1, a2.id AS a2 FROM users u JOIN accounts a1 ON a1.user_id = u.id AND a1.type = 'checking' JOIN accounts a2 ON a2.user_id = u.id AND a2.type = 'savings'")
    d.execute_sql("CREATE UNIQUE INDEX ON bench_pairs (n)"); d.execute_sql("ANALYZE")
    return d
dbs = {"before_010": make("hr_integrity_b0", "007_email_ownership"), "chain": make("hr_integrity_b1", None),
       "chain_hash_constant": make("hr_integrity_b2", None)}
# The same 010 writer and rules, with sha256 replaced by a constant: what the hash alone costs.
import importlib.util
spec = importlib.util.spec_from_file_location("m010", "migrations/010_ledger_integrity.py")
m010 = importlib.util.module_from_spec(spec); spec.loader.exec_module(m010)
ddl = m010.ENTRY_HASH.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
start, end = ddl.index("AS $$") + 5, ddl.rindex("$$")
ddl = ddl[:start] + "\n    SELECT sha256('\\x'::bytea)\n" + ddl[end:]
dbs["chain_hash_constant"].execute_sql(ddl)
script = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
script.write("\\set n random(1, 500)\nSELECT hoardrun_transfer(gen_random_uuid(), p.user_id, p.a1, p.a2, 1, 'USD', 'TRF-' || replace(gen_random_uuid()::text, '-', ''), 'ceiling') FROM bench_pairs p WHERE p.n = :n;\n"); script.close()
names = {"before_010": "hr_integrity_b0", "chain": "hr_integrity_b1", "chain_hash_constant": "hr_integrity_b2"}
res = {k: [] for k in names}
for rnd in range(3):
    for k, n in names.items():
        out = subprocess.run(["pgbench", "-n", "-M", "simple", "-c", "8", "-j", "2", "-T", "10", "-f", script.name, "-h", "127.0.0.1", "-U", "postgres", n], capture_output=True, text=True).stdout
        tps = [l for l in out.splitlines() if l.startswith("tps")][0].split()[2]
        lat = [l for l in out.splitlines() if "latency average" in l][0].split()[3]
        res[k].append(float(tps)); print(rnd, k, tps, lat, flush=True)
for k, v in res.items(): print(k, sorted(v), "median", sorted(v)[1])
for k in names.values(): admin(f'DROP DATABASE IF EXISTS {k} WITH (FORCE)')
