-- Return leases to the queue: the expired ones of every worker, or (force) all of one worker's
-- (its pod is gone, or a restarted process finds leases left by its previous life).
-- Each return is counted on the message itself ("<count>:<payload>" in the redelivered list),
-- never on its payload, so equal payloads are each their own message, and one that keeps
-- killing workers is dead-lettered.
-- KEYS: 1 redelivered  2 leased-workers  3 stats
-- ARGV: 1 key prefix  2 max per worker  3 worker id ("" = all)  4 force (1/0)  5 count (1/0)
-- Keys are built from the prefix inside the script; they share the hash tag, so they live in
-- the same Redis Cluster slot as KEYS.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local workers
if ARGV[3] ~= '' then workers = {ARGV[3]} else workers = redis.call('SMEMBERS', KEYS[2]) end
local limit = tonumber(ARGV[2])
local add = tonumber(ARGV[5])
local returned = 0
for _, w in ipairs(workers) do
  local key = ARGV[1] .. 'inflight:' .. w
  local members
  if ARGV[4] == '1' then
    members = redis.call('ZRANGE', key, 0, limit - 1)
  else
    members = redis.call('ZRANGEBYSCORE', key, '-inf', now_ms, 'LIMIT', 0, limit)
  end
  for _, m in ipairs(members) do
    local a = string.find(m, ':', 1, true)
    local dot = string.find(string.sub(m, 1, a - 1), '.', 1, true)
    local count = add
    if dot then count = count + tonumber(string.sub(m, dot + 1, a - 1)) end
    redis.call('RPUSH', KEYS[1], count .. ':' .. string.sub(m, a + 1))
    returned = returned + 1
  end
  if #members > 0 then redis.call('ZREM', key, unpack(members)) end
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', KEYS[2], w) end
end
if returned > 0 then redis.call('HINCRBY', KEYS[3], 'reaped', returned) end
return returned
