-- Schedule a failed message for another attempt after its backoff (server clock).
-- KEYS: 1 inflight(worker)  2 delayed  3 stats
-- ARGV: 1 member  2 new payload (attempt+1)  3 delay ms
-- Returns 1, or 0 if the lease was already gone (then the message is back in the queue anyway).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[2])
redis.call('HINCRBY', KEYS[3], 'retried', 1)
return 1
