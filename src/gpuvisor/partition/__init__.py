"""gpuvisor.partition: MIG geometry, layout planning, partition-tier placement and exports."""
