-- Return leases to the queue: the expired ones of every worker, or (force) all of one worker's
-- (its pod is gone, or a restarted process finds leases left by its previous life).
-- Each return is counted per payload so a message that keeps killing workers is dead-lettered.
-- KEYS: 1 ready  2 leased-workers  3 redeliveries  4 stats
-- ARGV: 1 key prefix  2 max per worker  3 worker id ("" = all)  4 force (1/0)  5 count (1/0)
-- Keys are built from the prefix inside the script; they share the hash tag, so they live in
-- the same Redis Cluster slot as KEYS.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local workers
if ARGV[3] ~= '' then workers = {ARGV[3]} else workers = redis.call('SMEMBERS', KEYS[2]) end
local limit = tonumber(ARGV[2])
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
    local payload = string.sub(m, string.find(m, ':', 1, true) + 1)
    redis.call('RPUSH', KEYS[1], payload)
    if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], redis.sha1hex(payload), 1) end
    returned = returned + 1
  end
  if #members > 0 then redis.call('ZREM', key, unpack(members)) end
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', KEYS[2], w) end
end
if returned > 0 then redis.call('HINCRBY', KEYS[4], 'reaped', returned) end
return returned
