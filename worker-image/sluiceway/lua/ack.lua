-- Acknowledge finished messages: drop their leases. A lease that is gone was already returned to
-- the queue (its worker looked dead); the message will run again, which at-least-once allows.
-- KEYS: 1 inflight(worker)  2 stats
-- ARGV: member...
-- Returns: number of leases that were still held.
local removed = redis.call('ZREM', KEYS[1], unpack(ARGV))
if removed > 0 then redis.call('HINCRBY', KEYS[2], 'acked', removed) end
return removed
