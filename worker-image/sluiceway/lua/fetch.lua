-- Atomically: promote due retries, take rate-limit slots, move messages into this worker's
-- in-flight set with a lease deadline. One round trip per batch, on the server's clock.
--
-- KEYS: 1 ready  2 delayed  3 inflight(worker)  4 leased-workers  5 ratelimit  6 sequence
--       7 redelivered
-- ARGV: 1 worker id  2 wanted  3 lease ms  4 qps (0 = unlimited)  5 burst  6 horizon µs
--       7 promote limit
-- Returns: {first_offset_us, interval_us, retry_after_us, new_tat, now_us, {redelivery counts},
--           member...}; now_us (the server's clock when it ran) lets the worker date the slots.
-- A member is "<lease seq>[.<redeliveries>]:<payload>": the sequence keeps identical payloads
-- distinct, and the count travels with the message. Everything after the first ':' is the
-- payload, as in the members of earlier versions, so workers of both versions can reap each
-- other's leases during a rolling upgrade. Redelivered messages (returned by reap or a
-- hand-back, as "<count>:<payload>") are taken before fresh ones.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local wanted = tonumber(ARGV[2])
local qps = tonumber(ARGV[4])

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[7]))
if #due > 0 then
  -- Retries go to the consumer end: they already waited their backoff.
  redis.call('RPUSH', KEYS[1], unpack(due))
  redis.call('ZREM', KEYS[2], unpack(due))
end

local returned = redis.call('LLEN', KEYS[7])
local depth = redis.call('LLEN', KEYS[1]) + returned
local take = math.min(wanted, depth)
local first_offset, step, retry_after, new_tat_s = 0, 0, 0, ''
if qps > 0 and take > 0 then
  step = 1000000 / qps
  local tolerance = tonumber(ARGV[5]) * step
  local start = now_us - tolerance
  local tat = tonumber(redis.call('GET', KEYS[5]) or '')
  if tat and tat > start then start = tat end
  local latest = now_us + tonumber(ARGV[6])
  first_offset = start - now_us
  if start > latest then
    take = 0
    retry_after = start - latest
  else
    take = math.min(take, math.floor((latest - start) / step) + 1)
    -- Slots are consumed only for messages actually taken, so nothing leased goes unused.
    -- Stored as a string so the graceful hand-back can compare it exactly.
    local new_tat = start + take * step
    new_tat_s = string.format('%.3f', new_tat)
    redis.call('SET', KEYS[5], new_tat_s, 'PX', math.ceil((new_tat - now_us) / 1000) + 60000)
  end
end

local out = {string.format('%.3f', first_offset), string.format('%.3f', step),
             string.format('%.3f', retry_after), new_tat_s, string.format('%.0f', now_us), {}}
if take <= 0 then return out end

local payloads, counts = {}, out[6]
if returned > 0 then
  for _, e in ipairs(redis.call('RPOP', KEYS[7], math.min(take, returned))) do
    local c = string.find(e, ':', 1, true)
    counts[#counts + 1] = tonumber(string.sub(e, 1, c - 1))
    payloads[#payloads + 1] = string.sub(e, c + 1)
  end
end
if #payloads < take then
  for _, p in ipairs(redis.call('RPOP', KEYS[1], take - #payloads)) do
    counts[#counts + 1] = 0
    payloads[#payloads + 1] = p
  end
end
local n = #payloads
local last = redis.call('INCRBY', KEYS[6], n)
local deadline = now_ms + tonumber(ARGV[3])
local zargs = {}
for i = 1, n do
  local member = tostring(last - n + i)
  if counts[i] > 0 then member = member .. '.' .. counts[i] end
  member = member .. ':' .. payloads[i]
  zargs[#zargs + 1] = deadline
  zargs[#zargs + 1] = member
  out[#out + 1] = member
end
redis.call('ZADD', KEYS[3], unpack(zargs))
redis.call('SADD', KEYS[4], ARGV[1])
return out
