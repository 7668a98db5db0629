-- Give messages back (graceful shutdown): they return to the consumer end of the queue at once,
-- and their unused rate-limit slots are handed back when no later lease exists.
-- With "count" set the messages were running (the grace period ended first): that counts as a
-- redelivery, so a message that keeps a worker from stopping is dead-lettered in the end.
-- KEYS: 1 inflight(worker)  2 ready  3 ratelimit  4 stats  5 redelivered
-- ARGV: 1 expected tat (µs, "" = none)  2 slot interval µs  3 slots to hand back  4 count (1/0)
--       5.. members ("<seq>[.<redeliveries>]:<payload>")
-- Returns the number of messages returned.
local returned = 0
local add = tonumber(ARGV[4])
for i = 5, #ARGV do
  local m = ARGV[i]
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local a = string.find(m, ':', 1, true)
    local dot = string.find(string.sub(m, 1, a - 1), '.', 1, true)
    local count = add
    if dot then count = count + tonumber(string.sub(m, dot + 1, a - 1)) end
    local payload = string.sub(m, a + 1)
    if count == 0 then
      redis.call('RPUSH', KEYS[2], payload)
    else
      redis.call('RPUSH', KEYS[5], count .. ':' .. payload)
    end
    returned = returned + 1
  end
end
if returned > 0 then redis.call('HINCRBY', KEYS[4], 'returned', returned) end
local slots = tonumber(ARGV[3])
if ARGV[1] ~= '' and slots > 0 then
  local tat = redis.call('GET', KEYS[3])
  if tat == ARGV[1] then
    local back = tonumber(tat) - slots * tonumber(ARGV[2])
    redis.call('SET', KEYS[3], string.format('%.3f', back), 'KEEPTTL')
  end
end
return returned
