-- Extend the leases of messages this worker still holds (running or prefetched).
-- KEYS: 1 inflight(worker)
-- ARGV: 1 lease ms  2.. members
-- Returns the number of leases renewed; fewer than asked means some were reaped meanwhile.
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local zargs = {}
for i = 2, #ARGV do
  zargs[#zargs + 1] = deadline
  zargs[#zargs + 1] = ARGV[i]
end
if #zargs == 0 then return 0 end
return redis.call('ZADD', KEYS[1], 'XX', 'CH', unpack(zargs))
