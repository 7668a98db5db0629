-- Move a message to the dead-letter list with the reason, in the same step as dropping its lease,
-- so it is never both lost and never twice in the dead-letter list.
-- KEYS: 1 inflight(worker)  2 dead  3 stats
-- ARGV: 1 member  2 dead-letter record (JSON)
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'dead', 1)
return 1
