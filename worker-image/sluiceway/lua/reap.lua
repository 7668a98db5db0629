-- Return leases to the queue: the expired ones of the given workers, or (force) all of them
-- (its pod is gone, or a restarted process finds leases left by its previous life).
-- Each return is counted on the message itself ("<count>:<payload>" in the redelivered list),
-- never on its payload, so equal payloads are each their own message, and one that keeps
-- killing workers is dead-lettered.
-- KEYS: 1 redelivered  2 leased-workers  3 stats  4.. inflight(worker), one per worker id
-- ARGV: 1 max per worker  2 force (1/0)  3 count (1/0)  4.. worker ids, in the order of KEYS[4..]
-- Every key is declared (the caller reads leased-workers first), so a Redis Cluster routes the
-- script to the one slot all of them share.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local add = tonumber(ARGV[3])
local returned = 0
for i = 4, #ARGV do
  local members
  if ARGV[2] == '1' then
    members = redis.call('ZRANGE', KEYS[i], 0, limit - 1)
  else
    members = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now_ms, 'LIMIT', 0, limit)
  end
  for _, m in ipairs(members) do
    local a = string.find(m, ':', 1, true)
    local dot = string.find(string.sub(m, 1, a - 1), '.', 1, true)
    local count = add
    if dot then count = count + tonumber(string.sub(m, dot + 1, a - 1)) end
    redis.call('RPUSH', KEYS[1], count .. ':' .. string.sub(m, a + 1))
    returned = returned + 1
  end
  if #members > 0 then redis.call('ZREM', KEYS[i], unpack(members)) end
  if redis.call('ZCARD', KEYS[i]) == 0 then redis.call('SREM', KEYS[2], ARGV[i]) end
end
if returned > 0 then redis.call('HINCRBY', KEYS[3], 'reaped', returned) end
return returned
