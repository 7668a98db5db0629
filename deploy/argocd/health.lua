-- Argo CD health check for sluiceway.dev/TaskQueue.
-- Installed through argocd-cm (deploy/argocd/argocd-cm.yaml carries this file verbatim as
-- resource.customizations.health.sluiceway.dev_TaskQueue); docs/gitops.md explains each state.
-- Argo CD's Lua VM has no string library, so messages are built with `..` only.
--
-- Order matters:
--   1. Progressing until the operator has written status for the current generation.
--   2. Degraded on Conflict, on Degraded=True, and on NoLiveWorkers only while work waits.
--   3. Suspended when paused or pinned to zero (spec.replicas: 0).
--   4. Healthy when Ready=True (workers rolled out to the desired size, or idle at zero).
--   5. Progressing otherwise (Ready=False WaitingForWorkers: the Deployment is still rolling).
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe this TaskQueue"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
    .. " (status is for " .. status.observedGeneration .. ")"
  return hs
end

local conflict = condition(status, "Conflict")
if conflict ~= nil and conflict.status == "True" then
  hs.status = "Degraded"
  hs.message = said(conflict, "Another TaskQueue uses the same queue")
  return hs
end

local degraded = condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  local backlog = status.backlog or 0
  -- NoLiveWorkers with nothing waiting is not an outage; any other Degraded reason is.
  if degraded.reason ~= "NoLiveWorkers" or backlog > 0 then
    hs.status = "Degraded"
    hs.message = said(degraded, "Degraded: " .. (degraded.reason or "unknown"))
    return hs
  end
end

local spec = obj.spec or {}
local ready = condition(status, "Ready")
if ready ~= nil and ready.reason == "Paused" then
  hs.status = "Suspended"
  hs.message = said(ready, "Paused")
  return hs
end
if spec.paused == true then
  hs.status = "Suspended"
  hs.message = "Paused by spec.paused"
  return hs
end
if spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "Pinned to zero workers by spec.replicas"
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = said(ready, "Waiting for workers to be ready")
return hs
