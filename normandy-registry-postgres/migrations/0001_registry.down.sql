DROP TABLE IF EXISTS normandy_placements;
DROP TABLE IF EXISTS normandy_node_leases;
