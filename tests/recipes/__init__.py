"""Recipe tests. A package (unlike the other test folders) because its modules share
basenames with tests/models (test_ddsnet.py, test_adarevd.py, test_hyperres.py): as
top-level modules pytest would refuse to collect both in one run."""
