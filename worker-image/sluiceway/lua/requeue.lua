-- Give messages back unstarted (graceful shutdown): they return to the consumer end of the queue
-- at once, and their unused rate-limit slots are handed back when no later lease exists.
-- KEYS: 1 inflight(worker)  2 ready  3 ratelimit  4 stats
-- ARGV: 1 expected tat (µs, "" = none)  2 slot interval µs  3 slots to hand back  4.. members
-- Returns the number of messages returned.
local returned = 0
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], string.sub(ARGV[i], string.find(ARGV[i], ':', 1, true) + 1))
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
